"""Volumes on other machines: addresses, the ssh client side and `serve --stdio`."""
