"""vhost-user-fs back-end: serves nydusd.fs.proto over virtqueues to a VM (QEMU)."""
