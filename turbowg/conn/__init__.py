"""turbowg.conn"""
