# Drawn by qtune-bench; re-run with `gnuplot quant_error.gp` in this folder (scripts/plot_bench.sh does every plot).
set terminal pngcairo size 1000,640 enhanced font 'DejaVu Sans,10'
set output 'quant_error.png'
set encoding utf8
set grid lc rgb '#dddddd'
set key noenhanced
set termoption noenhanced
$m0 << EOD
4.13401 0.0943926
4.5 0.0943262
4.5 0.0883372
4.25 0.0997972
3.5 0.185719
4 0.313749
2.5 0.43757
8.5 0.00524139
8.43337 0.0059856
8.47285 0.00592141
EOD
$m1 << EOD
4.12696 0.0920419
4.5 0.0920181
4.5 0.0860823
4.25 0.096909
3.5 0.184527
4 0.302202
2.5 0.431519
8.5 0.00519262
8.00781 0.00867828
8.25 0.00646568
EOD
$m2 << EOD
4.12696 0.123513
4.5 0.123128
4.5 0.124027
4.25 0.160233
3.5 0.256262
4 0.321239
2.5 0.509277
8.5 0.00757934
8.00781 0.0428907
8.25 0.0137639
EOD
$m3 << EOD
4.12695 0.0919851
4.5 0.0919612
4.5 0.0860531
4.25 0.0968776
3.5 0.18442
4 0.302122
2.5 0.431264
8.5 0.00519093
8.00781 0.00867329
8.25 0.00646135
EOD
$m4 << EOD
4.12695 0.0919936
4.5 0.0919691
4.5 0.0860755
4.25 0.0969012
3.5 0.1845
4 0.302125
2.5 0.43133
8.5 0.0051918
8.00291 0.00922486
8.25 0.00646504
EOD
set title 'Size vs error: relative Frobenius error ||W - deq(q(W))|| / ||W||'
set xlabel 'bits per parameter (nbytes x 8 / numel)'
set ylabel 'relative error (log)'
set logscale y
set key top right box opaque
set lmargin at screen 0.08
set rmargin at screen 0.97
set tmargin at screen 0.92
set bmargin at screen 0.09
set xrange [1.5:10.5]
set yrange [0.001:1]
set label 1 'nf4' at 4.20785,0.0777261 left font ',8'
set label 2 'nf4 dq=false' at 4.5809,0.0920181 left font ',8'
set label 3 'hqq nbits=4' at 4.5809,0.0726934 left font ',8'
set label 4 'hqq nbits=4 gs=128' at 3.03652,0.0691078 left font ',8'
set label 5 'hqq nbits=3' at 3.5809,0.218513 left font ',8'
set label 6 'hqq nbits=2 gs=16' at 4.0809,0.302202 left font ',8'
set label 7 'hqq nbits=2' at 2.5809,0.431519 left font ',8'
set label 8 'hqq nbits=8' at 8.5809,0.00519262 left font ',8'
set label 9 'int8' at 8.08871,0.00867828 left font ',8'
set label 10 'int8 gs=128' at 7.46124,0.00646568 left font ',8'
plot $m0 using 1:2 with points pt 5 ps 1.4 title 'stories260K (36 matrices)', \
     $m1 using 1:2 with points pt 7 ps 1.4 title 'gaussian 4096x4096', \
     $m2 using 1:2 with points pt 9 ps 1.4 title 'student_t3 4096x4096', \
     $m3 using 1:2 with points pt 11 ps 1.4 title 'gaussian 11008x4096', \
     $m4 using 1:2 with points pt 13 ps 1.4 title 'gaussian 4096x11008'
