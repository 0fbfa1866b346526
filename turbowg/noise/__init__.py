"""turbowg.noise"""
