"""turbowg.tun"""
