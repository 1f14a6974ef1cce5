"""`hil-sandbox`: see hil_sandbox.fake_wecom."""

from hil_sandbox.fake_wecom import main

if __name__ == "__main__":
    main()
