"""turbowg.daemon: the I/O layer around the sans-IO device core: TUN (turbowg/tun), UDP (turbowg/conn),
UAPI (turbowg/uapi) and the event loop, wired together in runtime.py."""
