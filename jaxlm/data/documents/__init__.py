"""Documents (lm, mlm, span corruption): read, clean, tokenize into the cache, cut into rows."""
