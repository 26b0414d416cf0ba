"""The Ray stages of mdlda: one stage per file, each a function taking a config and returning what it made."""
