from grantkey.cli.main import main

main()
