"""The tools around the amskv library, which serving never imports: the `amskv` command line, the demo-model
training and quality sweeps (`demo`), and every benchmark (`bench`). They may import `amskv` and `server`;
neither imports them."""
