"""Evidence -> answer helpers that policies share (the SQL table reader, ...)."""
