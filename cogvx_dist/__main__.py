from cogvx_dist.cli import main; import sys; sys.exit(main())
