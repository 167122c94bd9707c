if __name__ == "__main__":
    # Workers started by the launcher import this module again as __mp_main__: importing the CLI
    # (typer, rich) only here keeps their start-up free of it.
    from .cli import main

    main()
