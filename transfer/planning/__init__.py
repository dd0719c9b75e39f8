"""Planning, apart from running: which ranks do what (the chooser) and what each needs."""
