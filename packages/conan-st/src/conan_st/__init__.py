"""conan-st."""
