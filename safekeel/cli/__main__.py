from safekeel.cli.main import main

main()
