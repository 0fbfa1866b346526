"""turbowg.device"""
