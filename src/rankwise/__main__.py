from rankwise.cli.app import main

main()
