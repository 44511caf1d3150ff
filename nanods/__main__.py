from nanods.cli import main

main()
