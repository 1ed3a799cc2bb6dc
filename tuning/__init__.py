"""Ray Tune searches over cached features."""
