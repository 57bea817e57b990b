"""The command-line programs of `peft-cc` (`peft-cc <command>`), one module each."""
