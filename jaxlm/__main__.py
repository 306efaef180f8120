from jaxlm.cli import run_main

run_main()
