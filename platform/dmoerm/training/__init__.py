"""Router training and DMoERM phases 1-3, all on cached frozen-trunk features."""
