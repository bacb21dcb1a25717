"""Models: the ViT backbone, the projection and DINO heads, and the network that joins them."""
