"""The man pages tlshd(8) and tlshd.conf(5) as roff, built from docs/ by tools/mkman.py."""
