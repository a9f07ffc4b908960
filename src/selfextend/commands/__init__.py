"""The `selfextend` subcommands, one module each: ``add_arguments(parser)`` and ``run(args) -> int``
(registered in ``selfextend.cli``); ``common`` holds the arguments, checks and errors they share.

Commands import the libraries (``evaluation``, ``serve``, ``vllm``, ``bench``, ...); no library imports
``commands``.
"""
