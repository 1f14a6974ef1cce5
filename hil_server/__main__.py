from hil_server.cli import main

main()
