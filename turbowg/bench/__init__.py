"""turbowg.bench"""
