"""Network-namespace helpers live in turbowg.testing (installed with the package); nothing to set up here."""
