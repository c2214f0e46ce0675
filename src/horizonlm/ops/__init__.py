"""Pure tensor functions: the fast operators and, in ``reference``, their slow float64 twins."""
