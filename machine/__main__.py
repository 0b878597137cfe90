from machine.entry import main

main()
