"""Our own FUSE protocol engine (kernel ABI bytes <-> Vfs calls), independent of any transport."""
