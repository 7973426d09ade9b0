"""polycolor: colour polygon outlines by colour name with a conditional UNet, trained, tuned and served on Ray."""
