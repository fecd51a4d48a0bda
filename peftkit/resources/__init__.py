"""Built-in data files: the general-knowledge forgetting set and the general replay set."""
