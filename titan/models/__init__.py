"""The networks: the 9-channel frequency input, ConvNeXt V2, heads, SimMIM, baselines, CBAM."""
