"""The ``minimind`` subcommands: one module each (a library function, ``configure_parser``,
``main``), plus ``common`` (flags shared by every command, ``load_engine``), ``upstream``
(eval_llm.py's flag names → files) and ``render`` (terminal output)."""
