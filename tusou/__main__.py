from tusou.cli import main

main()
