"""turbowg.uapi"""
