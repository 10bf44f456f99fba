def v6_bytes(b): raise NotImplementedError
