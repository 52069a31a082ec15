from photoz.cli import main

raise SystemExit(main())
