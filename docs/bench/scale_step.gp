# Drawn by qtune-bench; re-run with `gnuplot scale_step.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1200,540 enhanced font 'DejaVu Sans,10'
set output 'scale_step.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$s0 << EOD
15.1917 326.861 30.3909 129.933 1 230.92
60.6684 477.143 121.367 276.399 1 416.653
251.17 1006.79 502.411 497.839 1 1184.86
1100.05 3084.49 2200.28 1515.94 1 4595.35
EOD
$s1 << EOD
15.1917 326.951 26.2823 103.723 0.798276 279.085
60.6684 440.832 64.1171 369.581 1.33713 494.465
251.17 755.741 195.232 679.735 1.36537 1488.04
1100.05 1549.39 665.067 2290.38 1.51086 5845.42
EOD
$s2 << EOD
15.1917 335.167 26.9902 107.792 0.829596 328.298
60.6684 510.833 66.945 408.343 1.47736 642.109
251.17 760.205 206.942 930.542 1.86916 1485.91
1100.05 1581.96 713.302 3085.74 2.03552 5848.47
EOD
$s3 << EOD
15.1917 329.118 33.8344 136.714 1.05219 358.396
60.6684 505.348 93.9064 277.576 1.00426 831.259
251.17 864.395 317.672 630.447 1.26637 2040.75
1100.05 2068.05 1167.57 1998.79 1.31851 5934.12
EOD
set multiplot layout 1,2 title 'Step time vs model size'
set xlabel 'parameters (millions, log)'
set logscale x
set key top left
set title 'optimizer step (ms, log)'
set logscale y
plot $s0 using 1:4 with linespoints lt 1 pt 7 lw 2 title 'lora', \
     $s1 using 1:4 with linespoints lt 2 pt 7 lw 2 title 'qlora nf4', \
     $s2 using 1:4 with linespoints lt 3 pt 7 lw 2 title 'qlora hqq nbits=4', \
     $s3 using 1:4 with linespoints lt 4 pt 7 lw 2 title 'qlora int8'
set title 'QLoRA step / LoRA step'
unset logscale y
set yrange [0:*]
plot $s1 using 1:5 with linespoints lt 2 pt 7 lw 2 title 'qlora nf4', \
     $s2 using 1:5 with linespoints lt 3 pt 7 lw 2 title 'qlora hqq nbits=4', \
     $s3 using 1:5 with linespoints lt 4 pt 7 lw 2 title 'qlora int8', \
     1 with lines dt 2 lc rgb 'black' notitle, 1.15 with lines dt 3 lc rgb 'red' title '+15%'
unset multiplot
