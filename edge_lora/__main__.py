from edge_lora.cli import main

main()
