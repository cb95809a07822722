from rlvrx.cli import main

main()
