"""`hil-sandbox` / `python -m hil_sandbox`: fake WeCom + HIL Server (direct mode) on 127.0.0.1."""

from hil_sandbox.sandbox import main

if __name__ == "__main__":
    main()
