from devcloud_worker.cli import main

main()
