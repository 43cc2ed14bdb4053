"""An example fedstack task: a small CNN on a local folder of images."""
