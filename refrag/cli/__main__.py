from refrag.cli import main

main()
