"""Built-in edit strategies (installed as ``rewriter.plugins``)."""
