"""Image-quality code shared by the vision studies (the DiT axis, vision generation)."""
