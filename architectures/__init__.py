"""Built-in architecture maps (installed as ``rewriter.architectures``)."""
