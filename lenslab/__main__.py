from lenslab.cli import main

raise SystemExit(main())
