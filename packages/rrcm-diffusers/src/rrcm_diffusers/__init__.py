"""rrcm-diffusers."""
