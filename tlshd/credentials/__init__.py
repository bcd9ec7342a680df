"""What a request authenticates with: credential files, trust stores, keyring keys, and the
SSL contexts built from them (I/O, unlike tlshd.handshake)."""
