"""turbowg.derp"""
